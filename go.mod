module wsdrain

go 1.26
